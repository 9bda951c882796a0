// Probe (not part of the build): a 3×3 convolution forward (stride 1, pad 1, batch 4) on the AMX
// tiles of a Sapphire Rapids-class Xeon, bf16 operands, f32 accumulation, against an f64
// reference. It measures how much faster the CPU training step's GEMMs could run with AMX; see
// docs/benchmarks.md ("issue 16, eighth session").
//
//   gcc -O2 -march=sapphirerapids -fopenmp amx_conv_probe.c -o amx_conv_probe -lm
//   OMP_NUM_THREADS=2 ./amx_conv_probe C_IN C_OUT SIZE          # e.g. 32 32 64
//   BFREF=1 OMP_NUM_THREADS=2 ./amx_conv_probe 32 32 64         # reference on bf16-rounded operands
//
// Layout: the input is converted once to bf16 with channel pairs interleaved and a zero border,
// X2[n][c/2][H+2][W+2][2], so that for one tap the 16 channel pairs × 16 pixels a B tile needs are
// 16 rows of 64 contiguous bytes, one plane apart: one `tileloadd` with the plane as stride, no
// im2col. A tiles are the weights per tap, [16 outputs][up to 32 channels]; C tiles are 16 outputs ×
// 16 pixels, stored straight into the output rows. The bias is a separate pass (a real kernel
// would add it in the epilogue). Requires Linux ≥ 5.16 (arch_prctl ARCH_REQ_XCOMP_PERM).
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <time.h>
#include <immintrin.h>
#include <omp.h>
typedef struct { uint8_t palette, start_row, r[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed)) cfg_t;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static inline uint16_t bf(float f){uint32_t u; memcpy(&u,&f,4); u += 0x7fff + ((u>>16)&1); return u>>16;}
int N=4,C,O,H,W;
// x: [N][C][H][W]; w: [O][C][3][3]; out [N][O][H][W]
void ref(const float*x,const float*w,const float*b,float*out){
  #pragma omp parallel for collapse(2)
  for(int n=0;n<N;n++)for(int o=0;o<O;o++)for(int y=0;y<H;y++)for(int xx=0;xx<W;xx++){
    double s=b[o];
    for(int c=0;c<C;c++)for(int dy=0;dy<3;dy++)for(int dx=0;dx<3;dx++){
      int iy=y+dy-1, ix=xx+dx-1; if(iy<0||iy>=H||ix<0||ix>=W)continue;
      float xv=x[((n*C+c)*H+iy)*W+ix], wv=w[((o*C+c)*3+dy)*3+dx]; if(getenv("BFREF")){uint32_t u=(uint32_t)bf(xv)<<16; memcpy(&xv,&u,4); u=(uint32_t)bf(wv)<<16; memcpy(&wv,&u,4);} s+=(double)xv*wv;}
    out[((n*O+o)*H+y)*W+xx]=s;}
}
int main(int argc,char**argv){
  C=atoi(argv[1]);O=atoi(argv[2]);H=W=atoi(argv[3]);
  syscall(SYS_arch_prctl, 0x1023, 18);
  int Hp=H+2, Wp=W+2, CP=C/2, KB = C<32?C:32; // channels per tile op
  size_t plane=(size_t)Hp*Wp; // pixels per padded plane
  float*x=malloc(sizeof(float)*N*C*H*W),*w=malloc(sizeof(float)*O*C*9),*b=malloc(4*O);
  float*out=aligned_alloc(64,sizeof(float)*N*O*H*W),*o2=malloc(sizeof(float)*N*O*H*W);
  for(size_t i=0;i<(size_t)N*C*H*W;i++) x[i]=sinf(i*0.37f);
  for(int i=0;i<O*C*9;i++) w[i]=cosf(i*0.11f)*0.1f; for(int i=0;i<O;i++)b[i]=0.01f*i;
  uint16_t*X2=aligned_alloc(64, 2*(size_t)N*CP*plane*2+4096);
  // A: per tap, per cblock, per oblock: 16 rows x KB bf16
  int nCB=C/KB, nOB=O/16;
  uint16_t*A=aligned_alloc(64, 2*(size_t)9*nCB*nOB*16*KB);
  for(int t=0;t<9;t++)for(int cb=0;cb<nCB;cb++)for(int ob=0;ob<nOB;ob++)for(int r=0;r<16;r++)for(int k=0;k<KB;k++){
    int o=ob*16+r, c=cb*KB+k; // VNNI for A? A is row-major [M][K] plain.
    A[((((size_t)t*nCB+cb)*nOB+ob)*16+r)*KB+k]=bf(w[((o*C+c)*3+t/3)*3+t%3]);}
  double best=1e9;
  for(int rep=0;rep<20;rep++){
  double t0=now();
  // convert: X2[n][cp][Hp][Wp][2]
  #pragma omp parallel for collapse(2)
  for(int n=0;n<N;n++)for(int cp=0;cp<CP;cp++){
    uint16_t*d=X2+((size_t)n*CP+cp)*plane*2;
    memset(d,0,Wp*4); memset(d+(size_t)(Hp-1)*Wp*2,0,Wp*4);
    const float*s0=x+((size_t)(n*C+2*cp))*H*W, *s1=s0+H*W;
    for(int y=0;y<H;y++){ uint16_t*r=d+(size_t)(y+1)*Wp*2; r[0]=r[1]=0; r[(Wp-1)*2]=r[(Wp-1)*2+1]=0;
      for(int xx=0;xx<W;xx+=16){
        __m512 a=_mm512_loadu_ps(s0+y*W+xx), bb=_mm512_loadu_ps(s1+y*W+xx);
        __m512i pk=(__m512i)_mm512_cvtne2ps_pbh(bb,a); // low 16 = a, high 16 = bb, as bf16
        // interleave a,b pairs: want [a0 b0 a1 b1 ...]
        __m512i idx=_mm512_set_epi16(31,15,30,14,29,13,28,12,27,11,26,10,25,9,24,8,23,7,22,6,21,5,20,4,19,3,18,2,17,1,16,0);
        __m512i il=_mm512_permutexvar_epi16(idx,pk);
        _mm512_storeu_si512(r+(xx+1)*2, il);
      }}
  }
  // conv
  int strips=W/16;
  #pragma omp parallel
  {
    cfg_t cfg; memset(&cfg,0,sizeof cfg); cfg.palette=1;
    for(int i=0;i<4;i++){cfg.rows[i]=16;cfg.colsb[i]=64;}      // C tiles: 16 o x 16 px f32
    cfg.rows[4]=16; cfg.colsb[4]=KB*2;                          // A: 16 o x KB bf16
    cfg.rows[5]=KB/2; cfg.colsb[5]=64;                          // B: KB/2 pairs x 16 px x 2
    _tile_loadconfig(&cfg);
    #pragma omp for collapse(3)
    for(int n=0;n<N;n++)for(int ob=0;ob<nOB;ob++)for(int y=0;y<H;y++){
      for(int s0=0;s0<strips;s0+=4){ int ns=strips-s0<4?strips-s0:4;
        _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
        for(int t=0;t<9;t++){int dy=t/3,dx=t%3;
          for(int cb=0;cb<nCB;cb++){
            _tile_loadd(4, A+((((size_t)t*nCB+cb)*nOB+ob)*16)*KB, KB*2);
            const uint16_t*bb=X2+(((size_t)n*CP+cb*KB/2)*plane + (size_t)(y+dy)*Wp + dx)*2;
            _tile_loadd(5, bb+(size_t)(s0+0)*32, plane*4); _tile_dpbf16ps(0,4,5);
            if(ns>1){_tile_loadd(5, bb+(size_t)(s0+1)*32, plane*4); _tile_dpbf16ps(1,4,5);}
            if(ns>2){_tile_loadd(5, bb+(size_t)(s0+2)*32, plane*4); _tile_dpbf16ps(2,4,5);}
            if(ns>3){_tile_loadd(5, bb+(size_t)(s0+3)*32, plane*4); _tile_dpbf16ps(3,4,5);}
          }}
        float*dst=out+(((size_t)n*O+ob*16)*H+y)*W+s0*16;
        _tile_stored(0,dst,(size_t)H*W*4); if(ns>1)_tile_stored(1,dst+16,(size_t)H*W*4);
        if(ns>2)_tile_stored(2,dst+32,(size_t)H*W*4); if(ns>3)_tile_stored(3,dst+48,(size_t)H*W*4);
      }
    }
    _tile_release();
  }
  // bias (epilogue pass, as a fused conv would do in the store)
  #pragma omp parallel for collapse(2)
  for(int n=0;n<N;n++)for(int o=0;o<O;o++){float*p=out+((size_t)n*O+o)*H*W; for(int i=0;i<H*W;i++)p[i]+=b[o];}
  double t=now()-t0; if(t<best)best=t;
  }
  ref(x,w,b,o2);
  double num=0,den=0; for(size_t i=0;i<(size_t)N*O*H*W;i++){num+=(out[i]-o2[i])*(out[i]-o2[i]);den+=o2[i]*o2[i];}
  double fl=2.0*N*O*C*9*H*W;
  printf("%3d->%3d %3d^2: AMX %.3f ms (%.0f GFLOP/s incl. conversion+bias), rel err vs f64 %.2e\n",C,O,H,best*1e3,fl/best/1e9,sqrt(num/den));
}
